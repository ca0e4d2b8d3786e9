"""Reports: tables and plots made from results (parquet rows, metrics.json). Nothing
here imports Ray or MLflow."""
