"""What shapes a generation's output: JSON schemas compiled to llguidance grammars, fields copied from the
prompt, tool calls, and the shortest valid close when the token budget runs out. The decoding loop
(edgellm/daemon/engine/sequence.py) asks a constraint for its mask and feeds it the sampled token."""
