"""The console commands: cifarpipe-compare, cifarpipe-predict, cifarpipe-reproduce."""
