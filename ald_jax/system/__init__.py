"""The running system: an actor pool (threads or Ray processes), the learner
driver (one call per batch) and the learner loop, wired by `run.train`."""
