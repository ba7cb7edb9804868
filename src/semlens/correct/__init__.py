"""Human-in-the-loop correction through named units: the feedback store, activation enhancement and
correction propagation."""
