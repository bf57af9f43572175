//! The status page: tiers in waterfall order, updated live over server-sent events.
