"""One module per task other than train: eval, predict, export, explain, lr_find, bench."""
