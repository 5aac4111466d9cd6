"""Sharing results on the Hugging Face Hub: model cards and uploads (`tunelite upload`)."""
