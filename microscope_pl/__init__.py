"""microscope_pl."""
