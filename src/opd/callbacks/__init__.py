"""Cross-cutting training concerns (EMA, image grids); never algorithm logic."""
