//! msh (to be written)
