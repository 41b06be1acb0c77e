//! timer (to be written)
