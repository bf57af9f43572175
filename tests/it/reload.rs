//! SIGHUP: a valid change is applied to the tiers it touches; an invalid one is refused.
