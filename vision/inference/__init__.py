"""Running trained models: the engine (BN folding, channels_last, precision, compile), TTA, ensembles,
the folder runner, drawing and export."""
