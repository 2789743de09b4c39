"""Library code the training recipes share: the run directory (run.py), SFT (sft.py), and the GRPO and VLA pieces
(grpo/, vla/). Recipes in vltune/recipes/ are short scripts over these; no recipe imports another."""
