"""Reading a T1 image and its geometry, checking it, fixing it and conforming it for the network."""
