"""The ground the other rooms stand on: the device and precision, seeding, and which process of a
distributed run this is. Nothing here imports from another tunelite room but `errors`."""
