"""What main_eval.py is built from: context choice (contexts), baselines (baselines), per-case and
per-dataset scores (scoring), and the files and tables it writes (reports)."""
