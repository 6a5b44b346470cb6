"""VATT pretraining with cross-modality gradient harmonization (the lab's flagship job)."""
