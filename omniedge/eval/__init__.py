"""`omniedge eval`: the omni-mini suite (perplexity, image accuracy, speech WER with 95% CIs) and expert load."""
