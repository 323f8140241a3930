"""``python tests/exit_probe.py ARGS...`` runs ``degla-fast ARGS...`` and, once it has returned,
prints the names of the threads still alive (``threads at exit: ...``) to stderr.

What is alive then meets interpreter shutdown; a process group's threads there occasionally end a
finished rank in SIGABRT, so the trainer must leave with none (tests/test_train_distributed.py).
"""
import os
import sys

from degla_fast.cli import main


def thread_names() -> list[str]:
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    return sorted(open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks))


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    # One write of the whole line (atomic on a pipe below 4 KiB): print() writes the text and its
    # newline separately, and two ranks finishing together once ran their lines into one.
    os.write(2, ("threads at exit: " + " ".join(thread_names()) + "\n").encode())
    sys.exit(code)
