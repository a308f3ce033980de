"""Model-agnostic training: optimiser recipes, sharded train state, the jitted step, checkpoints and the loop."""
