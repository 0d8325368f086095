"""The one-host system: pinned actor threads, queue, parameter slot, learner loop."""
