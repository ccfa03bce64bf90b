"""Tensor parallelism: process groups (parallel_state), which slice each rank loads (sharding), the collectives
the model needs (tp_layers), rank 0's runner facade and the worker loop (executor), and how workers start
(launcher: local processes here; Ray actors are registered by deployments/ and jobs/)."""
