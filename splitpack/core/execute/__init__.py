"""Execute: the reference interpreter that runs a program pack by pack, band by band."""
