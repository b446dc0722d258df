"""GRPO: reward environments, rollouts (local or an OpenAI-compatible server), the objective, the loop."""
