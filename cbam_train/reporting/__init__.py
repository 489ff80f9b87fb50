"""What a run shows: console, train.log, metrics files, charts, attention numbers and pictures, MLflow."""
