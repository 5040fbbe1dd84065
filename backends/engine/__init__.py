"""Continuous batching over one llama.cpp context: requests decode together, one llama_decode a step.
llama-cpp-python's Llama class decodes one sequence at a time (docs/engine.md), hence this engine. Its rooms,
as llama.cpp's server keeps slot state apart from the loop that builds each batch:

    loop.py       the engine's thread: admit, build one batch a step, decode, hand out draws, recover
    admission.py  the waiting queue of tickets, promises to running answers, the load answers are planned for
    kv.py         slots and their KV cells: placement, compaction, prefix sharing and reuse
    sampling.py   drawing each token of a job (the grammar checked lazily), finishing
    warm_up.py    what a step and a prompt cost on this machine, measured before serving
    work.py       the records of a request the rooms share (ticket, load, job, slot, result): none imports
                  another room
    step_clock.py when the running step began, in memory a supervisor in another process can read

Time is priced in one place, the time model in backends/sizing.py.
"""
from backends.engine.loop import MAX_BROKEN_STEPS, Engine
from backends.engine.work import Job, Load, Result, Ticket

__all__ = ["Engine", "Job", "Load", "MAX_BROKEN_STEPS", "Result", "Ticket"]
