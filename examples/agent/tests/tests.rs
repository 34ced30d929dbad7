//! The reference agent driven as a user drives it: one test binary.

mod agent;
