"""The reward-model stage: the reward model as a scorer, its Bradley-Terry training, held-out evaluation and gates."""
