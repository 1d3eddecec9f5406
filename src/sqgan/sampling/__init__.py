"""Sampling from a trained G beyond plain z ~ N(0, I): multi-modal truncation (truncation.py) and cluster-guided
sampling (cluster.py). Core: no Ray, MLflow, DVC or KFP imports."""
