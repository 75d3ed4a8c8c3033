//! Zones: content blocks, their table, and the keys in use.
