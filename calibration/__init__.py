"""INT8 calibration: activation capture over the sampling trajectory, ranges, Q/DQ insertion."""
