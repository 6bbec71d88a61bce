"""Evaluation: perplexity and MoSA selection statistics (`mosa eval`)."""
