"""The stage bodies (download, split, train, evaluate) that the thin scripts in stages/ call."""
