import attrs

def build(cfg:
    pass
