"""Writing predictions as images."""

from labelwise.report.png import overlay, write_gray_png, write_id_png, write_prediction_pngs, write_rgb_png

__all__ = ["overlay", "write_gray_png", "write_id_png", "write_prediction_pngs", "write_rgb_png"]
