def get_world_size():
    return 1


def get_global_rank():
    return 0


def is_initialized():
    return False


def barrier():
    pass


def initialize_dist(device, timeout=300.0):
    pass
