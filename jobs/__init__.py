"""labtrain jobs: one folder per workload, each `python -m jobs.<name>` and a Ray job."""
