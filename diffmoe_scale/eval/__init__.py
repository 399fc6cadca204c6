"""Evaluation: Fréchet distance on features, and the digit classifier that gives digits its features."""
