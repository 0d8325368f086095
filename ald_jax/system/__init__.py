"""The running system: an actor pool (threads, processes or Ray), the learner
driver (one call per batch) and the learner loop, wired by `run.train`."""
