"""Fine-tune: turn selected examples into batches and update the policy."""
