"""Data layer: calibration capture and running statistics (Gram matrices per layer)."""
