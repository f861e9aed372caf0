"""`svam eval`: closed-loop evaluation of trained policies (Meta-World rollouts)."""
