//! Pool and server configuration (TOML) and hardware profiles.
