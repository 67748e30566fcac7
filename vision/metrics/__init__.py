"""Pictures and tables of runs and data sets: training curves, PR curves, confusion matrices.

Nothing is imported here: ``vision.metrics.plots`` loads matplotlib only inside the functions that
draw, so commands that never draw (``vision predict``) never pay for it.
"""
