"""Vision-language-action policies the RoboVLMs way: VLM backbone + action head, trained on robot demos.

`vltune vla` trains (vltune/recipes/vla.py), `vltune eval vla` runs closed-loop episodes
(vltune/recipes/eval_vla.py), and `Policy.from_pretrained(dir).step(images, instruction, state)`
controls a robot (vltune/vla/policy.py).
"""
