"""Neural architecture search on the cluster: WeakNAS and baselines, trials as Ray tasks (see README.md)."""
