//! `ha-provision`: builds the stand described by one topology file.
