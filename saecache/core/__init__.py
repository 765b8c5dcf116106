"""Shared by every stage: errors, devices, token counts, settings, progress, atomic files, locations, torchrun."""
