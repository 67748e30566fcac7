"""Where and how code runs: device, precision, process group, host memory, console and progress."""
