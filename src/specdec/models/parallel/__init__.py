"""Tensor parallelism: a target bigger than one device, sharded with transformers' tensor-parallel
plans over torch.distributed (gloo on CPU, NCCL on CUDA).

`group` (how the ranks meet, talk and fail), `target` (rank 0's `ShardedTarget` and the other
ranks' `follow` loop), `launch` (checks and start-up), `worker` (the process a rank runs when this
package starts it). Rank 0 runs the whole decoding loop; the other ranks only replay its target calls.
"""
