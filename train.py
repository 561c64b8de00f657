"""Train, fine-tune, evaluate and benchmark the models of models.py (see issue 4)."""
