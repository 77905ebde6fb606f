"""The training machinery every system shares: callbacks, checkpoint IO, strategies, optimisers, resilience."""
