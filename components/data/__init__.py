"""Data: prompt files in their forms, conversations, preference pairs, and the DVC pin of each dataset a run reads."""
