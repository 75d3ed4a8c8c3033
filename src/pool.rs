//! A pool: data device, staging device and metadata directory.
